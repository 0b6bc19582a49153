"""The WAL: exact recovery, torn tails truncated, other corruption refused, no idle writes."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from p2porch.consensus import storage as storage_mod
from p2porch.consensus.messages import (
    Entry,
    EntryKind,
    HardState,
    Membership,
    PersistentState,
    Snapshot,
    SnapshotMeta,
)
from p2porch.consensus.storage import (
    DiskFull,
    Storage,
    StorageCorruption,
    StorageFailed,
)

MEMBERS = Membership(frozenset({"a", "b", "c"}))


def entry(index: int, term: int = 1, data: bytes | None = None) -> Entry:
    return Entry(term, index, EntryKind.NORMAL, data if data is not None else b"x%d" % index)


def snap(index: int, term: int, data: bytes = b"state") -> Snapshot:
    return Snapshot(SnapshotMeta(index, term, MEMBERS), data)


def reopen(path: Path, **kwargs: int) -> PersistentState:
    with Storage.open(path, **kwargs) as store:
        return store.load()


def test_fresh_directory_is_empty(tmp_path: Path) -> None:
    with Storage.open(tmp_path / "d") as store:
        assert store.fresh
        state = store.load()
    assert state == PersistentState.empty()


def test_restart_recovers_exactly(tmp_path: Path) -> None:
    with Storage.open(tmp_path) as store:
        store.save_snapshot(PersistentState.bootstrap(MEMBERS).snapshot)  # type: ignore[arg-type]
        store.save(HardState(1, "a", 0), [entry(1), entry(2)], None, sync=True)
        store.save(HardState(1, "a", 2), [entry(3)], None, sync=True)
        store.save(None, [entry(4, data=b"")], None, sync=False)
    state = reopen(tmp_path)
    assert state.hard_state == HardState(1, "a", 2)
    assert state.entries == (entry(1), entry(2), entry(3), entry(4, data=b""))
    assert state.snapshot == PersistentState.bootstrap(MEMBERS).snapshot


def test_overwrite_truncates_the_suffix(tmp_path: Path) -> None:
    with Storage.open(tmp_path) as store:
        store.save(HardState(1, None, 0), [entry(i) for i in range(1, 6)], None, sync=True)
        store.save(HardState(2, "b", 2), [entry(3, term=2), entry(4, term=2)], None, sync=True)
        assert store.last_index == 4
    state = reopen(tmp_path)
    assert state.entries == (entry(1), entry(2), entry(3, term=2), entry(4, term=2))


def test_one_fsync_per_save_batch(tmp_path: Path) -> None:
    with Storage.open(tmp_path) as store:
        store.save(HardState(1, None, 0), [entry(1)], None, sync=True)  # creates a segment
        before = store.stats()
        store.save(HardState(1, None, 1), [entry(i) for i in range(2, 50)], None, sync=True)
        after = store.stats()
        assert after.fsyncs - before.fsyncs == 1
        assert after.writes - before.writes == 1
        store.save(None, [entry(50)], None, sync=False)
        assert store.stats().fsyncs == after.fsyncs


def test_idle_means_no_writes(tmp_path: Path) -> None:
    with Storage.open(tmp_path) as store:
        store.save(HardState(1, "a", 1), [entry(1)], None, sync=True)
        before = store.stats()
        sizes = {p: p.stat().st_size for p in tmp_path.iterdir()}
        mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
        for _ in range(100):
            store.save(None, [], None, sync=True)
            store.save(HardState(1, "a", 1), [], None, sync=True)  # unchanged hard state
        assert store.stats() == before
        assert {p: p.stat().st_size for p in tmp_path.iterdir()} == sizes
        assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == mtimes


def _write_records(path: Path, count: int) -> Path:
    with Storage.open(path) as store:
        for i in range(1, count + 1):
            store.save(HardState(1, "a", i - 1), [entry(i)], None, sync=False)
        (segment,) = store.segment_paths()
    return segment


def _record_offsets(segment: Path) -> list[int]:
    return [offset for offset, _ in storage_mod.iter_records(segment)]


def test_torn_tail_at_every_byte_of_the_last_record_is_truncated(tmp_path: Path) -> None:
    golden = tmp_path / "golden"
    segment = _write_records(golden, 5)
    data = segment.read_bytes()
    last_start = _record_offsets(segment)[-1]
    expected = reopen(golden)
    for cut in range(last_start, len(data)):
        case = tmp_path / f"cut{cut}"
        case.mkdir()
        (case / segment.name).write_bytes(data[:cut])
        state = reopen(case)
        # The last record was the final hard state; everything before it survives.
        assert state.entries == expected.entries
        assert state.hard_state == HardState(1, "a", 3)
        assert (case / segment.name).stat().st_size == last_start
        # And the store keeps working after the truncation.
        with Storage.open(case) as store:
            store.save(HardState(1, "a", 4), [entry(6)], None, sync=True)
        assert reopen(case).entries[-1] == entry(6)


def test_garbled_last_record_is_truncated(tmp_path: Path) -> None:
    segment = _write_records(tmp_path, 5)
    data = bytearray(segment.read_bytes())
    last_start = _record_offsets(segment)[-1]
    for position in (last_start, last_start + 2, last_start + 9, len(data) - 1):
        damaged = bytearray(data)
        damaged[position] ^= 0x10
        segment.write_bytes(bytes(damaged))
        assert reopen(tmp_path).hard_state == HardState(1, "a", 3)
        segment.write_bytes(bytes(data))


def test_zero_filled_tail_is_truncated(tmp_path: Path) -> None:
    segment = _write_records(tmp_path, 3)
    size = segment.stat().st_size
    with open(segment, "ab") as handle:
        handle.write(b"\0" * 100)
    assert reopen(tmp_path).entries == (entry(1), entry(2), entry(3))
    assert segment.stat().st_size == size


@pytest.mark.parametrize("where", ["header", "length", "payload", "trailer"])
def test_flipped_bit_in_the_middle_is_refused(tmp_path: Path, where: str) -> None:
    segment = _write_records(tmp_path, 6)
    offsets = _record_offsets(segment)
    victim = offsets[3]
    position = {"length": victim, "header": victim + 5, "payload": victim + 10}.get(
        where, offsets[4] - 1
    )
    data = bytearray(segment.read_bytes())
    data[position] ^= 0x04
    segment.write_bytes(bytes(data))
    with pytest.raises(StorageCorruption) as info:
        Storage.open(tmp_path)
    assert info.value.path == segment
    assert info.value.offset == victim
    assert str(segment) in str(info.value)
    assert f"offset {victim}" in str(info.value)
    assert segment.read_bytes() == bytes(data)  # never "repaired"


def test_damage_in_an_older_segment_is_refused_even_at_its_end(tmp_path: Path) -> None:
    with Storage.open(tmp_path, segment_bytes=4096) as store:
        for i in range(1, 200):
            store.save(HardState(1, None, i - 1), [entry(i, data=b"v" * 64)], None, sync=False)
        first = store.segment_paths()[0]
        assert len(store.segment_paths()) > 2
    with open(first, "r+b") as handle:
        handle.truncate(first.stat().st_size - 3)
    with pytest.raises(StorageCorruption, match=first.name):
        Storage.open(tmp_path, segment_bytes=4096)


def test_segments_roll_and_compaction_deletes_covered_ones(tmp_path: Path) -> None:
    with Storage.open(tmp_path, segment_bytes=4096) as store:
        for i in range(1, 301):
            store.save(HardState(1, "a", i - 1), [entry(i, data=b"v" * 64)], None, sync=False)
        segments = store.segment_paths()
        assert len(segments) >= 5
        assert store.compact(150) == 0  # no snapshot yet: nothing is covered
        store.save_snapshot(snap(150, 1))
        removed = store.compact(150)
        assert removed >= 1
        remaining = store.segment_paths()
        assert remaining == segments[removed:]
        assert all(not p.exists() for p in segments[:removed])
    state = reopen(tmp_path, segment_bytes=4096)
    assert state.snapshot == snap(150, 1)
    assert state.hard_state == HardState(1, "a", 299)
    assert [e.index for e in state.entries] == list(range(151, 301))


def test_compaction_keeps_hard_state_when_old_segments_go(tmp_path: Path) -> None:
    with Storage.open(tmp_path, segment_bytes=4096) as store:
        store.save(HardState(7, "c", 0), [], None, sync=True)
        for i in range(1, 200):
            store.save(None, [entry(i, term=7, data=b"v" * 64)], None, sync=False)
        store.save_snapshot(snap(199, 7))
        assert store.compact(199) >= 1
    state = reopen(tmp_path, segment_bytes=4096)
    assert state.hard_state == HardState(7, "c", 0)
    assert state.entries == ()


def test_received_snapshot_replaces_the_log(tmp_path: Path) -> None:
    with Storage.open(tmp_path) as store:
        store.save(HardState(1, None, 2), [entry(i) for i in range(1, 21)], None, sync=True)
        store.save(HardState(2, None, 10), [], snap(10, 2), sync=True)
        assert store.last_index == 10
        store.save(None, [entry(11, term=2), entry(12, term=2)], None, sync=True)
    state = reopen(tmp_path)
    assert state.snapshot == snap(10, 2)
    assert state.entries == (entry(11, term=2), entry(12, term=2))
    assert state.hard_state == HardState(2, None, 10)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".snap"]) == 1


def test_crash_after_snapshot_file_before_log_mark_drops_divergent_log(tmp_path: Path) -> None:
    with Storage.open(tmp_path) as store:
        store.save(HardState(1, None, 2), [entry(i) for i in range(1, 21)], None, sync=True)
        store._write_snapshot_file(snap(10, 2))  # the mark never made it to the WAL
    assert reopen(tmp_path).entries == ()


def test_local_snapshot_keeps_matching_suffix(tmp_path: Path) -> None:
    with Storage.open(tmp_path) as store:
        store.save(HardState(1, None, 15), [entry(i) for i in range(1, 21)], None, sync=True)
        store.save_snapshot(snap(15, 1))
    assert [e.index for e in reopen(tmp_path).entries] == list(range(16, 21))


def test_corrupt_snapshot_file_is_refused(tmp_path: Path) -> None:
    with Storage.open(tmp_path) as store:
        store.save_snapshot(snap(5, 1, data=b"z" * 100))
    (snap_file,) = [p for p in tmp_path.iterdir() if p.suffix == ".snap"]
    data = bytearray(snap_file.read_bytes())
    data[40] ^= 1
    snap_file.write_bytes(bytes(data))
    with pytest.raises(StorageCorruption, match=snap_file.name):
        Storage.open(tmp_path)


def test_leftover_temp_snapshot_is_ignored(tmp_path: Path) -> None:
    with Storage.open(tmp_path) as store:
        store.save(HardState(1, None, 0), [entry(1)], None, sync=True)
    (tmp_path / "snap-00000000000000000009-00000000000000000001.snap.tmp").write_bytes(b"junk")
    state = reopen(tmp_path)
    assert state.snapshot is None
    assert state.entries == (entry(1),)
    assert not list(tmp_path.glob("*.tmp"))


def test_disk_full_raises_and_refuses_everything_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Storage.open(tmp_path)
    store.save(HardState(1, None, 0), [entry(1)], None, sync=True)

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(DiskFull):
        store.save(None, [entry(2)], None, sync=True)
    monkeypatch.undo()
    with pytest.raises(StorageFailed):
        store.save(None, [entry(2)], None, sync=True)
    store.close()
    assert reopen(tmp_path).entries == (entry(1),)


def test_fsync_failure_is_a_storage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Storage.open(tmp_path)
    store.save(HardState(1, None, 0), [entry(1)], None, sync=True)

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(storage_mod.StorageError, match="I/O error"):
        store.save(None, [entry(2)], None, sync=True)
    store.close()


def test_random_histories_recover_like_a_model(tmp_path: Path) -> None:
    """Appends, overwrites, snapshots and compaction in random order; every reopen must give
    back exactly what an in-memory model of the log holds."""
    rng = random.Random(3)
    model: list[Entry] = []
    snapshot: Snapshot | None = None
    hard = HardState(0, None, 0)
    term = 1
    store = Storage.open(tmp_path, segment_bytes=4096)
    for step in range(400):
        roll = rng.random()
        if roll < 0.6:
            first = (model[-1].index if model else (snapshot.meta.index if snapshot else 0)) + 1
            if model and rng.random() < 0.2:
                base = snapshot.meta.index if snapshot else 0
                first = rng.randint(max(base + 1, hard.commit + 1), model[-1].index + 1)
                term += 1
            new = [entry(first + k, term, b"d" * rng.randint(0, 80)) for k in range(3)]
            model = [e for e in model if e.index < first] + new
            hard = HardState(term, None, max(hard.commit, first - 1))
            store.save(hard, new, None, sync=rng.random() < 0.5)
        elif roll < 0.7 and model and hard.commit > (snapshot.meta.index if snapshot else 0):
            at = hard.commit
            term_at = next(e.term for e in model if e.index == at)
            snapshot = snap(at, term_at, b"s%d" % step)
            store.save_snapshot(snapshot)
            store.compact(at)
            model = [e for e in model if e.index > at]
        elif roll < 0.9:
            store.close()
            store = Storage.open(tmp_path, segment_bytes=4096)
            state = store.load()
            assert state.entries == tuple(model)
            assert state.snapshot == snapshot
            assert state.hard_state == hard
        else:
            base = (model[-1].index if model else 0) + 5
            term += 1
            snapshot = snap(base, term)
            hard = HardState(term, None, base)
            store.save(hard, [], snapshot, sync=True)
            model = []
    store.close()


def test_crash_while_creating_a_segment_keeps_hard_state(tmp_path: Path) -> None:
    with Storage.open(tmp_path, segment_bytes=4096) as store:
        store.save(HardState(3, "b", 0), [], None, sync=True)
        for i in range(1, 120):
            store.save(None, [entry(i, term=3, data=b"v" * 64)], None, sync=False)
        segments = store.segment_paths()
    assert len(segments) >= 2
    # A new segment whose header never made it to disk (torn inside the header).
    torn = tmp_path / f"wal-{len(segments) + 1:010d}.log"
    torn.write_bytes(b"\x10\x00")
    with Storage.open(tmp_path, segment_bytes=4096) as store:
        assert not torn.exists()
        assert store.load().hard_state == HardState(3, "b", 0)
        store.save(None, [entry(120, term=3)], None, sync=True)
        store.save_snapshot(snap(120, 3))
        assert store.compact(120) >= 1
    state = reopen(tmp_path, segment_bytes=4096)
    assert state.hard_state == HardState(3, "b", 0)
    assert state.entries == ()
