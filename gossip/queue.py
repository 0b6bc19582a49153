"""Transmit-limited broadcast queue: which rumours ride on the next outgoing datagram.

Pure helper of the core (no I/O, no clock). Each rumour is keyed by the member it is about,
so a newer rumour about a node *replaces* (invalidates) the older one -- an Alive refuting a
Suspect, a Dead superseding both -- and the queue never carries contradicting news.

Order of selection: fewest transmissions first (fresh news spreads fastest), then priority
(Dead/Left > Suspect > Alive), then newest. Each rumour is sent at most ``limit`` times
(``retransmit_mult * ceil(log10(N + 1))``: enough that, with fan-out, every member hears it
with high probability) and is then dropped.
"""

from __future__ import annotations

#: msgpack framing of a Compound: fixarray + tag + array16 header for the parts list.
COMPOUND_OVERHEAD_BYTES = 5


def part_cost(size: int) -> int:
    """Bytes one part of ``size`` bytes adds to a Compound (msgpack bin8 / bin16 header)."""
    return size + (2 if size < 256 else 3)


class _Item:
    __slots__ = ("data", "key", "priority", "seq", "transmits")

    def __init__(self, key: str, data: bytes, priority: int, seq: int) -> None:
        self.key = key
        self.data = data
        self.priority = priority
        self.seq = seq
        self.transmits = 0


class BroadcastQueue:
    """Rumours waiting to be piggybacked, at most one per member name."""

    def __init__(self) -> None:
        self._items: dict[str, _Item] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def queue(self, key: str, data: bytes, priority: int) -> None:
        """Add a rumour about ``key``, replacing any older rumour about the same member."""
        self._seq += 1
        self._items[key] = _Item(key, data, priority, self._seq)

    def peek(self, key: str) -> bytes | None:
        item = self._items.get(key)
        return None if item is None else item.data

    def transmits(self, key: str) -> int | None:
        item = self._items.get(key)
        return None if item is None else item.transmits

    def take(self, budget_bytes: int, limit: int) -> list[bytes]:
        """Rumours fitting in ``budget_bytes`` (counted as Compound parts), best first.

        Every rumour returned counts one transmission; those that reach ``limit`` leave the
        queue.
        """
        if not self._items or budget_bytes <= 2:
            return []
        if len(self._items) == 1:
            ordered = list(self._items.values())
        else:
            ordered = sorted(
                self._items.values(), key=lambda it: (it.transmits, -it.priority, -it.seq)
            )
        out: list[bytes] = []
        left = budget_bytes
        for item in ordered:
            cost = part_cost(len(item.data))
            if cost > left:
                continue
            left -= cost
            out.append(item.data)
            item.transmits += 1
            if item.transmits >= limit:
                del self._items[item.key]
            if left < 16:
                break
        return out

    def clear(self) -> None:
        self._items.clear()
