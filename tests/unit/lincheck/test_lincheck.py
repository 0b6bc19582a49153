"""The linearizability checker accepts linearizable histories and rejects the others."""

from __future__ import annotations

import random

from p2porch.consensus.lincheck import Op, OpKind, check, check_history


def put(client: str, value: bytes, call: float, ret: float | None, key: str = "k") -> Op:
    return Op(client, key, OpKind.PUT, value, None, call, ret)


def get(client: str, result: bytes | None, call: float, ret: float | None, key: str = "k") -> Op:
    return Op(client, key, OpKind.GET, None, result, call, ret)


def cas(
    client: str,
    expected: bytes | None,
    value: bytes,
    ok: bool,
    call: float,
    ret: float | None,
    key: str = "k",
) -> Op:
    return Op(client, key, OpKind.CAS, value, ok, call, ret, expected=expected)


def delete(client: str, existed: bool | None, call: float, ret: float | None) -> Op:
    return Op(client, "k", OpKind.DELETE, None, existed, call, ret)


def test_empty_history_is_linearizable() -> None:
    assert check_history([])


def test_sequential_history_accepted() -> None:
    ops = [
        put("a", b"1", 0, 1),
        get("b", b"1", 2, 3),
        cas("a", b"1", b"2", True, 4, 5),
        cas("b", b"1", b"3", False, 6, 7),
        get("a", b"2", 8, 9),
        delete("b", True, 10, 11),
        get("a", None, 12, 13),
    ]
    assert check_history(ops)


def test_stale_read_after_completed_write_rejected() -> None:
    ops = [
        put("a", b"1", 0, 1),
        put("a", b"2", 2, 3),
        get("b", b"1", 4, 5),  # the write of 2 completed before this read began
    ]
    assert not check_history(ops)


def test_concurrent_read_may_see_either_value() -> None:
    for seen in (b"1", b"2"):
        ops = [put("a", b"1", 0, 1), put("a", b"2", 2, 6), get("b", seen, 3, 5)]
        assert check_history(ops)


def test_read_of_never_written_value_rejected() -> None:
    assert not check_history([put("a", b"1", 0, 1), get("b", b"9", 2, 3)])


def test_new_old_inversion_between_readers_rejected() -> None:
    # Reader b sees the new value, then reader c (starting after b returned) sees the old one.
    ops = [
        put("w", b"1", 0, 1),
        put("w", b"2", 2, 20),
        get("b", b"2", 3, 4),
        get("c", b"1", 5, 6),
    ]
    assert not check_history(ops)


def test_two_successful_cas_from_same_expected_rejected() -> None:
    ops = [
        put("w", b"0", 0, 1),
        cas("a", b"0", b"a", True, 2, 5),
        cas("b", b"0", b"b", True, 2, 5),
    ]
    assert not check_history(ops)


def test_cas_on_absent_key() -> None:
    assert check_history([cas("a", None, b"x", True, 0, 1), get("b", b"x", 2, 3)])
    assert not check_history([cas("a", None, b"x", False, 0, 1)])


def test_pending_write_may_have_taken_effect() -> None:
    ops = [put("a", b"1", 0, 1), put("crashed", b"2", 2, None), get("b", b"2", 10, 11)]
    assert check_history(ops)


def test_pending_write_may_not_have_taken_effect() -> None:
    ops = [put("a", b"1", 0, 1), put("crashed", b"2", 2, None), get("b", b"1", 10, 11)]
    assert check_history(ops)


def test_pending_write_cannot_take_effect_before_its_call() -> None:
    ops = [put("a", b"1", 0, 1), get("b", b"2", 2, 3), put("crashed", b"2", 4, None)]
    assert not check_history(ops)


def test_pending_write_takes_effect_once() -> None:
    # Once a later read saw 1 again after seeing 2, the pending put of 2 cannot reappear.
    ops = [
        put("a", b"1", 0, 1),
        put("crashed", b"2", 2, None),
        get("b", b"2", 3, 4),
        put("a", b"1", 5, 6),
        get("b", b"1", 7, 8),
        get("b", b"2", 9, 10),
    ]
    assert not check_history(ops)


def test_pending_cas_either_way() -> None:
    base = [put("a", b"0", 0, 1), cas("c", b"0", b"1", True, 2, None)]
    assert check_history([*base, get("b", b"1", 5, 6)])
    assert check_history([*base, get("b", b"0", 5, 6)])


def test_delete_result_checked() -> None:
    assert not check_history([delete("a", True, 0, 1)])
    assert check_history([delete("a", False, 0, 1), delete("b", None, 2, 3)])


def test_keys_are_checked_independently_and_reported() -> None:
    ops = [
        put("a", b"1", 0, 1, key="good"),
        get("b", b"1", 2, 3, key="good"),
        put("a", b"1", 0, 1, key="bad"),
        get("b", b"2", 2, 3, key="bad"),
    ]
    result = check(ops)
    assert not result.ok
    assert result.failed_keys == ("bad",)
    assert result.keys_checked == 2


def test_initial_state_is_used() -> None:
    assert check_history([get("a", b"v", 0, 1)], initial={"k": b"v"})
    assert not check_history([get("a", b"v", 0, 1)])


def test_step_budget_reports_unknown_not_ok() -> None:
    ops = [put(f"c{i}", bytes([i]), 0, 100) for i in range(12)]
    ops.append(get("r", b"\xff", 101, 102))
    result = check(ops, max_steps_per_key=50)
    assert not result.ok
    assert result.unknown_keys == ("k",)


def _simulate_register(rng: random.Random, n_ops: int, clients: int) -> list[Op]:
    """A history produced by a real atomic register: each op takes effect at a random
    instant inside its interval, so the history is linearizable by construction."""
    state: bytes | None = None
    planned: list[tuple[float, float, float, str, int]] = []
    t = 0.0
    for i in range(n_ops):
        t += rng.random()
        call = t
        point = call + rng.random() * 3
        ret = point + rng.random() * 3
        planned.append((point, call, ret, f"c{i % clients}", i))
    ops: list[Op] = []
    for point, call, ret, client, i in sorted(planned):
        _ = point
        roll = rng.random()
        pending = rng.random() < 0.05
        ret_or_none = None if pending else ret
        if roll < 0.35:
            value = str(i).encode()
            state = value
            ops.append(put(client, value, call, ret_or_none))
        elif roll < 0.7:
            ops.append(get(client, state, call, ret_or_none))
        elif roll < 0.8:
            existed = state is not None
            state = None
            ops.append(delete(client, existed, call, ret_or_none))
        else:
            expected = state if rng.random() < 0.5 else b"nope"
            value = str(i).encode()
            ok = state == expected
            if ok:
                state = value
            ops.append(cas(client, expected, value, ok, call, ret_or_none))
    return ops


def test_histories_of_a_real_register_are_accepted() -> None:
    rng = random.Random(7)
    for _ in range(30):
        assert check_history(_simulate_register(rng, 60, 5))


def test_corrupted_histories_of_a_real_register_are_mostly_rejected() -> None:
    """Change one completed read's result to a value never written: always non-linearizable."""
    rng = random.Random(11)
    for _ in range(20):
        ops = _simulate_register(rng, 60, 5)
        reads = [i for i, op in enumerate(ops) if op.kind is OpKind.GET and op.ret is not None]
        victim = ops[rng.choice(reads)]
        ops[ops.index(victim)] = get(victim.client, b"never", victim.call, victim.ret)
        assert not check_history(ops)
