"""The core's in-memory view of the Raft log: a snapshot base plus the entries after it.

It also remembers how much of itself is stable (persisted by the shell), because only the
unstable tail goes into ``Ready.entries`` and a truncation below the stable point must be
re-sent to storage (which then truncates too).
"""

from __future__ import annotations

from p2porch.consensus.messages import Entry, Snapshot


class RaftLog:
    """Entries ``(snapshot_index, last_index]`` on top of an optional snapshot.

    A node that joined empty has no snapshot at all (``has_base`` is False): it accepts no
    entries until the leader installs a snapshot, since it does not know the membership yet.
    """

    def __init__(self, snapshot: Snapshot | None, entries: tuple[Entry, ...]) -> None:
        self.snapshot = snapshot
        self._offset = snapshot.meta.index if snapshot is not None else 0
        self._offset_term = snapshot.meta.term if snapshot is not None else 0
        expected = self._offset + 1
        kept: list[Entry] = []
        for entry in entries:
            if entry.index <= self._offset:
                continue  # covered by the snapshot (storage may keep a little overlap)
            if entry.index != expected:
                break  # a hole means storage lost the rest; keep the contiguous prefix
            kept.append(entry)
            expected += 1
        self._entries = kept
        self.stable_index = self.last_index

    # ----------------------------------------------------------------- queries

    @property
    def has_base(self) -> bool:
        return self.snapshot is not None

    @property
    def snapshot_index(self) -> int:
        return self._offset

    @property
    def snapshot_term(self) -> int:
        return self._offset_term

    @property
    def first_index(self) -> int:
        return self._offset + 1

    @property
    def last_index(self) -> int:
        return self._offset + len(self._entries)

    @property
    def last_term(self) -> int:
        return self._entries[-1].term if self._entries else self._offset_term

    def term(self, index: int) -> int | None:
        """Term of the entry at ``index``; None if compacted away or beyond the end."""
        if index == self._offset:
            return self._offset_term
        if index < self._offset or index > self.last_index:
            return None
        return self._entries[index - self._offset - 1].term

    def entry(self, index: int) -> Entry:
        return self._entries[index - self._offset - 1]

    def match_term(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Raft's election restriction: is (last_term, last_index) at least as new as ours?"""
        return (last_term, last_index) >= (self.last_term, self.last_index)

    def slice(self, lo: int, max_count: int, max_bytes: int) -> tuple[Entry, ...]:
        """Entries from ``lo`` on, at most ``max_count`` and about ``max_bytes`` (>= 1 entry)."""
        start = lo - self._offset - 1
        if start < 0:
            raise ValueError(f"entry {lo} is compacted (snapshot at {self._offset})")
        out: list[Entry] = []
        size = 0
        for entry in self._entries[start : start + max_count]:
            size += len(entry.data) + 16
            if out and size > max_bytes:
                break
            out.append(entry)
        return tuple(out)

    def entries_between(self, lo: int, hi: int) -> tuple[Entry, ...]:
        """Entries ``[lo, hi]`` (both inclusive), clipped to what the log holds."""
        lo = max(lo, self.first_index)
        hi = min(hi, self.last_index)
        if lo > hi:
            return ()
        return tuple(self._entries[lo - self._offset - 1 : hi - self._offset])

    def unstable(self) -> tuple[Entry, ...]:
        return tuple(self._entries[self.stable_index - self._offset :])

    def find_conflict(self, entries: tuple[Entry, ...]) -> int:
        """Index of the first entry that is new or disagrees with ours (0 if none)."""
        for entry in entries:
            if not self.match_term(entry.index, entry.term):
                return entry.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> int:
        """Largest index <= ``index`` whose term is <= ``term`` (fast back-tracking).

        Every entry above the returned index has a term > ``term`` in our log, so none of them
        can match a log whose entry at ``index`` has term ``term``: skip them in one step.
        """
        index = min(index, self.last_index)
        while index > self._offset:
            t = self.term(index)
            if t is not None and t <= term:
                return index
            index -= 1
        return self._offset

    # ----------------------------------------------------------------- mutations

    def append(self, entries: tuple[Entry, ...]) -> None:
        """Append entries, truncating our tail first if the first one is not past it."""
        if not entries:
            return
        first = entries[0].index
        if first <= self._offset:
            raise ValueError(f"append at {first} below the snapshot at {self._offset}")
        if first > self.last_index + 1:
            raise ValueError(f"append at {first} leaves a gap after {self.last_index}")
        if first <= self.last_index:
            del self._entries[first - self._offset - 1 :]
            self.stable_index = min(self.stable_index, first - 1)
        self._entries.extend(entries)

    def stable_to(self, index: int, term: int) -> None:
        """The shell persisted entries up to ``index`` (ignored if since overwritten)."""
        if self.term(index) == term and index > self.stable_index:
            self.stable_index = index

    def compact(self, snapshot: Snapshot) -> None:
        """Drop entries covered by a snapshot the shell took of its own state machine."""
        index = snapshot.meta.index
        if index <= self._offset:
            return
        if index > self.last_index:
            raise ValueError(f"cannot compact to {index}: log ends at {self.last_index}")
        del self._entries[: index - self._offset]
        self._offset = index
        self._offset_term = snapshot.meta.term
        self.snapshot = snapshot
        self.stable_index = max(self.stable_index, index)

    def restore(self, snapshot: Snapshot) -> None:
        """Replace everything with a snapshot received from the leader."""
        self._entries = []
        self._offset = snapshot.meta.index
        self._offset_term = snapshot.meta.term
        self.snapshot = snapshot
        self.stable_index = snapshot.meta.index
