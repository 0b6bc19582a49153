"""Linearizability checker for histories of a key-value register (put/get/delete/cas).

Why: the Raft shell's promise to clients is *linearizability* -- every operation appears to
take effect atomically at one instant between its call and its return. Unit tests cannot see
that property; a recorded history of concurrent client operations can be *checked* for it.

The search is Wing & Gong's, with Lowe's refinement and memoisation (as in Knossos/Porcupine):
walk the history's call/return events in time order; at a call, try to linearize that operation
now (apply it to the model; if the model agrees with the observed result, remove its call and
return events from the list and restart from the front); at a return whose operation has not
been linearized yet, the current prefix is impossible, so backtrack. A configuration
``(set of linearized operations, model state)`` seen before is never explored again, which
turns the exponential search into something practical for real histories.

Two more things make it fast and correct on real test histories:

* **P-compositionality**: linearizability is local (Herlihy & Wing), so a history is
  linearizable iff each key's sub-history is; each key is searched on its own.
* **Pending operations** (the client crashed or timed out, ``ret is None``): they may or may not
  have taken effect. They are given a return time of +infinity and any result; an operation
  that did not take effect is equivalent to one linearized after everything else.

Model: the register's state is the key's value, ``None`` when absent.

* ``PUT value``              -- state := value; result ignored.
* ``GET``                    -- result must equal state (``None`` = absent).
* ``DELETE``                 -- state := None; a ``bool`` result must say whether it existed.
* ``CAS expected -> value``  -- ``True`` iff state == expected (then state := value);
  ``expected=None`` means "only if absent".
"""

from __future__ import annotations

import enum
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import attrs

__all__ = ["CheckResult", "Op", "OpKind", "check", "check_history"]


class OpKind(enum.Enum):
    PUT = "put"
    GET = "get"
    DELETE = "delete"
    CAS = "cas"


@attrs.frozen
class Op:
    """One client operation as observed by the client.

    ``call``/``ret`` are timestamps from one clock shared by every client of the history
    (``time.monotonic()`` in one process); ``ret=None`` marks an operation that never returned.
    Equal timestamps count as concurrent, so a clock that stands still (trio's MockClock
    under load) makes everything concurrent and the search explode: there, number calls and
    returns from one counter instead (its order is the real-time order in one thread).
    ``value`` is the value written (PUT, CAS); ``expected`` the value a CAS compares against;
    ``result`` what the operation returned: the value read (GET, ``None`` = absent), whether
    the swap happened (CAS), whether the key existed (DELETE, or ``None`` if not reported);
    ignored for PUT and for pending operations.
    """

    client: str
    key: str
    kind: OpKind
    value: bytes | None
    result: bytes | bool | None
    call: float
    ret: float | None
    expected: bytes | None = None

    def __attrs_post_init__(self) -> None:
        if self.ret is not None and self.ret < self.call:
            raise ValueError(f"operation returns ({self.ret}) before it is called ({self.call})")


@attrs.frozen
class CheckResult:
    """Outcome of a check: ``ok`` is False if some key's history is not linearizable.

    ``failed_keys`` lists those keys; ``unknown_keys`` lists keys whose search exceeded the step
    budget (neither proven nor refuted -- treated as not ok so a test never passes by accident).
    """

    ok: bool
    keys_checked: int
    failed_keys: tuple[str, ...]
    unknown_keys: tuple[str, ...]
    steps: int


class _Node:
    """A call or return event in the doubly linked event list of one key."""

    __slots__ = ("is_call", "match", "next", "op_id", "prev")

    def __init__(self, op_id: int, is_call: bool) -> None:
        self.op_id = op_id
        self.is_call = is_call
        self.match: _Node | None = None
        self.prev: _Node | None = None
        self.next: _Node | None = None


_State = bytes | None


def _step(op: Op, state: _State) -> tuple[bool, _State]:
    """Apply ``op`` to the model: (does the observed result agree?, the state after)."""
    pending = op.ret is None
    if op.kind is OpKind.PUT:
        return True, op.value
    if op.kind is OpKind.GET:
        return (pending or op.result == state), state
    if op.kind is OpKind.DELETE:
        if pending or not isinstance(op.result, bool):
            return True, None
        return op.result == (state is not None), None
    # CAS
    matches = state == op.expected
    if pending:
        return True, (op.value if matches else state)
    if op.result is True:
        return matches, (op.value if matches else state)
    return (not matches), state


def _lift(call: _Node) -> None:
    """Remove a call event and its return event from the list."""
    ret = call.match
    assert ret is not None
    assert call.prev is not None
    call.prev.next = call.next
    if call.next is not None:
        call.next.prev = call.prev
    assert ret.prev is not None
    ret.prev.next = ret.next
    if ret.next is not None:
        ret.next.prev = ret.prev


def _unlift(call: _Node) -> None:
    """Undo :func:`_lift` (LIFO order keeps the neighbours' pointers valid)."""
    ret = call.match
    assert ret is not None
    assert ret.prev is not None
    ret.prev.next = ret
    if ret.next is not None:
        ret.next.prev = ret
    assert call.prev is not None
    call.prev.next = call
    if call.next is not None:
        call.next.prev = call


def _check_key(ops: Sequence[Op], initial: _State, max_steps: int) -> tuple[bool | None, int]:
    """Search one key's history: (True/False, or None when the budget ran out; steps used)."""
    events: list[tuple[float, int, int]] = []
    for i, op in enumerate(ops):
        # At equal timestamps calls sort before returns: such operations count as concurrent,
        # the lenient reading of an ambiguous clock.
        events.append((op.call, 0, i))
        events.append((math.inf if op.ret is None else op.ret, 1, i))
    events.sort()
    head = _Node(-1, False)
    calls: dict[int, _Node] = {}
    tail = head
    for _, kind, i in events:
        node = _Node(i, kind == 0)
        if kind == 0:
            calls[i] = node
        else:
            node.match = None
            calls[i].match = node
        node.prev = tail
        tail.next = node
        tail = node

    linearized = 0
    state: _State = initial
    stack: list[tuple[_Node, _State]] = []
    seen: set[tuple[int, _State]] = set()
    entry = head.next
    steps = 0
    while head.next is not None:
        steps += 1
        if steps > max_steps:
            return None, steps
        assert entry is not None
        if entry.is_call:
            ok, new_state = _step(ops[entry.op_id], state)
            if ok:
                new_linearized = linearized | (1 << entry.op_id)
                config = (new_linearized, new_state)
                if config not in seen:
                    seen.add(config)
                    stack.append((entry, state))
                    state = new_state
                    linearized = new_linearized
                    _lift(entry)
                    entry = head.next
                    continue
            entry = entry.next
        else:
            if not stack:
                return False, steps
            call, state = stack.pop()
            linearized &= ~(1 << call.op_id)
            _unlift(call)
            entry = call.next
    return True, steps


def check(
    ops: Iterable[Op],
    *,
    initial: dict[str, bytes] | None = None,
    max_steps_per_key: int = 5_000_000,
) -> CheckResult:
    """Check a whole history key by key (see the module docstring for the model)."""
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        by_key[op.key].append(op)
    start = initial or {}
    failed: list[str] = []
    unknown: list[str] = []
    total_steps = 0
    for key in sorted(by_key):
        verdict, steps = _check_key(by_key[key], start.get(key), max_steps_per_key)
        total_steps += steps
        if verdict is None:
            unknown.append(key)
        elif not verdict:
            failed.append(key)
    return CheckResult(
        ok=not failed and not unknown,
        keys_checked=len(by_key),
        failed_keys=tuple(failed),
        unknown_keys=tuple(unknown),
        steps=total_steps,
    )


def check_history(ops: Iterable[Op], *, initial: dict[str, bytes] | None = None) -> bool:
    """True iff the history is linearizable against the KV register model."""
    return check(ops, initial=initial).ok
