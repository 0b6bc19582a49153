"""Durable Raft storage: a segmented write-ahead log plus atomically written snapshots.

Why this shape. Raft's safety rests on three things surviving a power cut the moment a node
has said so to a peer: the hard state (term, vote, commit), the log entries it acknowledged, and
the snapshot it installed. Everything here serves that promise, with two constraints from edge
hardware: SD cards wear out (so nothing is written while nothing changes -- no periodic
rewrites, no preallocation, no heartbeat bookkeeping on disk) and fsyncs are slow (so every
``save`` call -- one Raft ``Ready`` batch -- costs at most one fsync: group commit).

On-disk layout of ``dir``::

    wal-0000000001.log      segments, appended in order, rolled at ``segment_bytes``
    wal-0000000002.log
    snap-<index>-<term>.snap   newest snapshot (older ones are removed after compaction)

Record framing (segments and snapshot files alike)::

    u32 length | u32 crc32(length bytes) | payload (length bytes) | u32 crc32(payload)

The header has its own checksum so a flipped bit in a *length* is recognised as corruption
instead of being mistaken for a short (torn) write that would silently swallow the rest of the
file. Payloads are codec records: :class:`HardState`, :class:`Entry`, and two of our own --
:class:`WalSegmentHeader` (first record of every segment: the hard state at the time, so older
segments can be deleted without losing it) and :class:`WalSnapshotMark` (an installed snapshot
replaced the whole log).

Replay semantics. Records are applied in order: a hard state replaces the previous one; an
entry with index ``i`` drops every entry ``>= i`` then appends (that is how the core's suffix
truncation is persisted -- nothing is rewritten in place); a snapshot mark drops every entry.
Afterwards entries covered by the newest snapshot are dropped, and entries after it are kept
only if they continue the snapshot (same term at its index, or start right after it).

Recovery. Only the *last* record of the *last* segment may be damaged -- that is a write the
machine died in the middle of, which was never acknowledged (acknowledgement follows fsync).
It is truncated away. Damage anywhere else is refused with :class:`StorageCorruption` naming
the file and the byte offset; the operator decides, never this code.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from p2porch.common import codec
from p2porch.common.errors import CodecError
from p2porch.consensus.errors import ConsensusError
from p2porch.consensus.messages import Entry, HardState, PersistentState, Snapshot

__all__ = [
    "DiskFull",
    "Storage",
    "StorageClosed",
    "StorageCorruption",
    "StorageError",
    "StorageFailed",
    "WalSegmentHeader",
    "WalSnapshotMark",
]


# --------------------------------------------------------------------------- errors


class StorageError(ConsensusError):
    """The disk could not do what Raft needs; the node must stop acknowledging anything."""


class StorageCorruption(StorageError):
    """Damaged data that is not a torn tail: refused, never silently repaired."""

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        super().__init__(f"corrupt Raft storage: {path} at byte offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


class DiskFull(StorageError):
    """ENOSPC (or EDQUOT) while writing: nothing in the failed batch may be acknowledged."""


class StorageFailed(StorageError):
    """A previous write failed; the storage refuses everything until reopened."""


class StorageClosed(StorageError):
    """The storage was closed."""


# --------------------------------------------------------------------------- records

# Codec tags 50-59 belong to the WAL (40-49: the KV state machine).


@codec.register(50)
@attrs.frozen
class WalSegmentHeader:
    """First record of every segment: which segment this is and the hard state when it began."""

    seq: int
    hard_state: HardState


@codec.register(51)
@attrs.frozen
class WalSnapshotMark:
    """A snapshot received from the leader replaced the log: drop every entry before this."""

    index: int
    term: int


_WalRecord = WalSegmentHeader | WalSnapshotMark | HardState | Entry

_HEADER = struct.Struct("<II")
_TRAILER = struct.Struct("<I")
_LEN = struct.Struct("<I")
MAX_RECORD_BYTES = 1 << 30
_SEGMENT_RE = re.compile(r"^wal-(\d{10})\.log$")
_SNAP_RE = re.compile(r"^snap-(\d{20})-(\d{20})\.snap$")
_EMPTY_HARD_STATE_ARGS = (0, None, 0)


def frame(payload: bytes) -> bytes:
    """One framed record (see the module docstring)."""
    length = _LEN.pack(len(payload))
    return length + _LEN.pack(zlib.crc32(length)) + payload + _TRAILER.pack(zlib.crc32(payload))


@attrs.frozen
class _Scan:
    """Result of scanning one file: the payloads, and where the valid data ends."""

    payloads: tuple[tuple[int, bytes], ...]
    valid_end: int
    torn: str | None  # why the tail after valid_end was judged torn, or None if clean


def _parse_at(data: bytes, offset: int) -> tuple[bytes, int] | str:
    """Parse one record at ``offset``: (payload, next offset) or a reason it is invalid.

    Reasons starting with "short" mean the file ends inside the record.
    """
    size = len(data)
    if offset + _HEADER.size > size:
        return "short header"
    length, header_crc = _HEADER.unpack_from(data, offset)
    if zlib.crc32(data[offset : offset + 4]) != header_crc:
        return "bad header checksum"
    if length > MAX_RECORD_BYTES:
        return f"record length {length} over the limit"
    end = offset + _HEADER.size + length + _TRAILER.size
    if end > size:
        return "short record"
    payload = data[offset + _HEADER.size : end - _TRAILER.size]
    (crc,) = _TRAILER.unpack_from(data, end - _TRAILER.size)
    if zlib.crc32(payload) != crc:
        return "bad payload checksum" if end < size else "bad payload checksum at end of file"
    return payload, end


def _valid_record_after(data: bytes, offset: int) -> int | None:
    """The first offset after ``offset`` where a valid record parses, if any."""
    for probe in range(offset + 1, len(data) - _HEADER.size - _TRAILER.size + 1):
        if not isinstance(_parse_at(data, probe), str):
            return probe
    return None


def _scan(path: Path, data: bytes, *, tail_may_tear: bool) -> _Scan:
    """Split a file into record payloads, deciding whether damage is a torn tail."""
    payloads: list[tuple[int, bytes]] = []
    offset = 0
    size = len(data)
    view = memoryview(data)
    unpack_header = _HEADER.unpack_from
    unpack_trailer = _TRAILER.unpack_from
    crc32 = zlib.crc32
    header_size = _HEADER.size
    while offset < size:
        # Fast path: a whole, valid record (the overwhelmingly common case at recovery).
        if offset + header_size <= size:
            length, header_crc = unpack_header(data, offset)
            end = offset + header_size + length + 4
            if (
                end <= size
                and length <= MAX_RECORD_BYTES
                and crc32(view[offset : offset + 4]) == header_crc
            ):
                payload = data[offset + header_size : end - 4]
                if crc32(payload) == unpack_trailer(data, end - 4)[0]:
                    payloads.append((offset, payload))
                    offset = end
                    continue
        parsed = _parse_at(data, offset)
        if not isinstance(parsed, str):  # pragma: no cover - the fast path takes these
            payloads.append((offset, parsed[0]))
            offset = parsed[1]
            continue
        reason = parsed
        torn = reason.startswith("short") or reason.endswith("at end of file")
        if reason == "bad header checksum" or reason.endswith("over the limit"):
            # The length is garbage, so where the record ends is unknown: it is a torn
            # tail only if nothing valid follows.
            later = _valid_record_after(data, offset)
            torn = later is None
            if later is not None:
                reason += f" (valid record follows at offset {later})"
        if torn and tail_may_tear:
            return _Scan(tuple(payloads), offset, reason)
        raise StorageCorruption(path, offset, reason)
    return _Scan(tuple(payloads), offset, None)


def _decode_record(path: Path, offset: int, payload: bytes) -> _WalRecord:
    try:
        record: _WalRecord = codec.decode(payload, _WalRecord)
    except CodecError as exc:
        reason = f"checksum ok but record undecodable: {exc}"
        raise StorageCorruption(path, offset, reason) from None
    return record


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _io_error(exc: OSError, what: str) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"disk full while {what}: {exc}")
    return StorageError(f"I/O error while {what}: {exc}")


class _ReplayedLog:
    """The log as replayed from the WAL: contiguous indices ``base..``, each with its term and
    its decoded entry (None for entries the snapshot covers, which are never decoded)."""

    def __init__(self) -> None:
        self.base = 0
        self.terms: list[int] = []
        self.entries: list[Entry | None] = []

    def clear(self) -> None:
        self.terms.clear()
        self.entries.clear()

    def place(self, path: Path, offset: int, index: int, term: int, entry: Entry | None) -> None:
        if self.terms:
            last = self.base + len(self.terms) - 1
            if index <= last:
                # An overwrite: the core truncated its log from here.
                cut = max(0, index - self.base)
                del self.terms[cut:]
                del self.entries[cut:]
            elif index != last + 1:
                raise StorageCorruption(path, offset, f"entry {index} leaves a gap after {last}")
        if not self.terms:
            self.base = index
        self.terms.append(term)
        self.entries.append(entry)

    def after_snapshot(self, snap: Snapshot | None) -> list[Entry]:
        """The entries that continue ``snap`` (all of them if there is no snapshot)."""
        snap_index = snap.meta.index if snap is not None else 0
        if snap is not None and self.terms:
            at_snap = snap_index - self.base
            if 0 <= at_snap < len(self.terms) and self.terms[at_snap] != snap.meta.term:
                # A log that disagrees with the snapshot (we crashed after writing a received
                # snapshot but before marking the log replaced): its suffix is not ours to keep.
                return []
            if self.base > snap_index + 1:
                return []
        start = max(0, snap_index + 1 - self.base)
        kept: list[Entry] = []
        for entry in self.entries[start:]:
            if entry is None:  # pragma: no cover - only covered entries are left undecoded
                raise StorageCorruption(Path("?"), 0, "undecoded entry after the snapshot")
            kept.append(entry)
        return kept


_ENTRY_TAG = codec.registered_tag(Entry)


def _peek_covered_entry(payload: bytes, covered: int) -> tuple[int, int] | None:
    """(index, term) if ``payload`` is an Entry at or below ``covered``, else None."""
    if covered <= 0:
        return None
    try:
        raw: Any = codec.decode(payload, Any)
    except CodecError:
        return None
    if (
        type(raw) is tuple
        and len(raw) >= 3
        and raw[0] == _ENTRY_TAG
        and type(raw[1]) is int
        and type(raw[2]) is int
        and raw[2] <= covered
    ):
        return raw[2], raw[1]
    return None


@attrs.define
class _Segment:
    seq: int
    path: Path
    size: int
    max_index: int  # highest entry index written to this segment (0 if none)


@attrs.frozen
class StorageStats:
    """Counters for tests and benchmarks (how much the disk was actually used)."""

    fsyncs: int
    writes: int
    bytes_written: int
    segments: int


class Storage:
    """The WAL + snapshot store of one node. Not thread-safe; the shell calls it from one task.

    ``save`` is synchronous on purpose: it is on the acknowledgement path, it is the one place a
    node may block on the disk, and the shell must not send or apply anything before it returns.
    """

    def __init__(self, directory: Path, segment_bytes: int) -> None:
        if segment_bytes < 4096:
            raise ValueError(f"segment_bytes must be at least 4096, got {segment_bytes}")
        self.directory = directory
        self.segment_bytes = segment_bytes
        self._segments: list[_Segment] = []
        self._fd: int | None = None
        self._hard_state = HardState(*_EMPTY_HARD_STATE_ARGS)
        self._snapshot: Snapshot | None = None
        self._snapshot_path: Path | None = None
        self._loaded: PersistentState | None = None
        self._failed: StorageError | None = None
        self._closed = False
        self._last_index = 0
        self._fsyncs = 0
        self._writes = 0
        self._bytes_written = 0

    # ----------------------------------------------------------------- opening / recovery

    @classmethod
    def open(cls, directory: str | os.PathLike[str], *, segment_bytes: int = 64 << 20) -> Storage:
        """Open (creating if needed) and recover the store in ``directory``.

        Raises :class:`StorageCorruption` for damage other than a torn tail.
        """
        path = Path(directory)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _io_error(exc, f"creating {path}") from exc
        store = cls(path, segment_bytes)
        store._recover()
        return store

    def _recover(self) -> None:
        try:
            names = sorted(os.listdir(self.directory))
        except OSError as exc:
            raise _io_error(exc, f"listing {self.directory}") from exc
        for name in names:
            if name.endswith(".tmp"):
                # A snapshot that never got renamed into place: it was never acknowledged.
                with contextlib.suppress(OSError):
                    os.unlink(self.directory / name)
        self._load_snapshot(names)
        segment_names = [n for n in names if _SEGMENT_RE.match(n)]
        log = _ReplayedLog()
        covered = self.snapshot_index
        hard_state = self._hard_state
        for position, name in enumerate(segment_names):
            seg_path = self.directory / name
            seq = int(name[4:14])
            is_last = position == len(segment_names) - 1
            try:
                data = seg_path.read_bytes()
            except OSError as exc:
                raise _io_error(exc, f"reading {seg_path}") from exc
            scan = _scan(seg_path, data, tail_may_tear=is_last)
            max_index = 0
            for number, (offset, payload) in enumerate(scan.payloads):
                peeked = _peek_covered_entry(payload, covered)
                if peeked is not None:
                    # Covered by the snapshot: only its position and term matter, so skip
                    # the (slow, schema-checked) full decode. Checksums were verified.
                    index, term = peeked
                    log.place(seg_path, offset, index, term, None)
                    max_index = max(max_index, index)
                    continue
                record = _decode_record(seg_path, offset, payload)
                if isinstance(record, Entry):
                    log.place(seg_path, offset, record.index, record.term, record)
                    max_index = max(max_index, record.index)
                elif isinstance(record, HardState):
                    hard_state = record
                elif isinstance(record, WalSegmentHeader):
                    if number != 0 or record.seq != seq:
                        raise StorageCorruption(
                            seg_path, offset, f"unexpected segment header (seq {record.seq})"
                        )
                    hard_state = record.hard_state
                else:
                    log.clear()
            if scan.torn is not None:
                self._truncate_tail(seg_path, scan.valid_end, len(data))
            if is_last and scan.valid_end == 0 and position > 0:
                # We died while creating this segment, before its header was durable. Remove
                # it, so the next append starts a segment WITH a header: a headerless segment
                # would lose the hard state once compaction deletes the older segments.
                self._remove_empty_segment(seg_path)
                continue
            self._segments.append(_Segment(seq, seg_path, scan.valid_end, max_index))
        self._hard_state = hard_state
        kept = log.after_snapshot(self._snapshot)
        self._last_index = kept[-1].index if kept else self.snapshot_index
        self._loaded = PersistentState(
            hard_state=hard_state, snapshot=self._snapshot, entries=tuple(kept)
        )

    def _remove_empty_segment(self, path: Path) -> None:
        try:
            os.unlink(path)
            _fsync_dir(self.directory)
        except OSError as exc:
            raise _io_error(exc, f"removing the empty segment {path}") from exc

    def _truncate_tail(self, path: Path, valid_end: int, size: int) -> None:
        try:
            with open(path, "r+b") as handle:
                handle.truncate(valid_end)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            what = f"truncating the torn tail of {path} ({size} -> {valid_end} bytes)"
            raise _io_error(exc, what) from exc

    def _load_snapshot(self, names: Sequence[str]) -> None:
        snaps = sorted(
            ((int(m.group(1)), int(m.group(2)), n) for n in names if (m := _SNAP_RE.match(n))),
            reverse=True,
        )
        if not snaps:
            return
        _, _, name = snaps[0]
        path = self.directory / name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise _io_error(exc, f"reading {path}") from exc
        scan = _scan(path, data, tail_may_tear=False)
        if len(scan.payloads) != 1:
            raise StorageCorruption(path, 0, f"{len(scan.payloads)} records, expected 1")
        try:
            snapshot: Snapshot = codec.decode(scan.payloads[0][1], Snapshot)
        except CodecError as exc:
            raise StorageCorruption(path, 0, f"snapshot undecodable: {exc}") from None
        self._snapshot = snapshot
        self._snapshot_path = path

    # ----------------------------------------------------------------- reading

    def load(self) -> PersistentState:
        """What the core starts from (recovered at ``open``)."""
        if self._loaded is None:
            raise StorageClosed("storage state already handed out or closed")
        return self._loaded

    @property
    def fresh(self) -> bool:
        """True if nothing was ever saved here (a brand-new node)."""
        return not self._segments and self._snapshot is None

    @property
    def hard_state(self) -> HardState:
        return self._hard_state

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    @property
    def snapshot_index(self) -> int:
        return self._snapshot.meta.index if self._snapshot is not None else 0

    @property
    def last_index(self) -> int:
        return self._last_index

    def stats(self) -> StorageStats:
        return StorageStats(
            fsyncs=self._fsyncs,
            writes=self._writes,
            bytes_written=self._bytes_written,
            segments=len(self._segments),
        )

    def segment_paths(self) -> list[Path]:
        return [s.path for s in self._segments]

    # ----------------------------------------------------------------- writing

    def _check_usable(self) -> None:
        if self._closed:
            raise StorageClosed("storage is closed")
        if self._failed is not None:
            raise StorageFailed(f"storage failed earlier: {self._failed}") from self._failed

    def save(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        snapshot: Snapshot | None,
        sync: bool,
    ) -> None:
        """Persist one Ready batch: snapshot first, then entries and hard state, one fsync.

        Returns only when the batch is on disk (if ``sync``). Raises :class:`StorageError`
        (:class:`DiskFull` for ENOSPC) otherwise, after which the storage refuses everything:
        the caller must stop the node instead of acknowledging what it could not write.
        """
        self._check_usable()
        if hard_state is not None and hard_state == self._hard_state:
            hard_state = None
        if hard_state is None and not entries and snapshot is None:
            return  # nothing changed: not a single byte touches the disk
        if snapshot is not None:
            self._write_snapshot_file(snapshot)
        chunks: list[bytes] = []
        if snapshot is not None:
            mark = WalSnapshotMark(snapshot.meta.index, snapshot.meta.term)
            chunks.append(frame(codec.encode(mark)))
        for entry in entries:
            chunks.append(frame(codec.encode(entry)))
        new_hard = hard_state if hard_state is not None else self._hard_state
        if hard_state is not None:
            chunks.append(frame(codec.encode(hard_state)))
        max_index = max((e.index for e in entries), default=0)
        self._append(b"".join(chunks), max_index, new_hard, sync or snapshot is not None)
        self._hard_state = new_hard
        if snapshot is not None:
            self._last_index = snapshot.meta.index
        if entries:
            self._last_index = entries[-1].index

    def _append(self, blob: bytes, max_index: int, hard_state: HardState, sync: bool) -> None:
        try:
            if self._fd is None or self._segments[-1].size >= self.segment_bytes:
                self._roll(hard_state_for_header=self._hard_state)
            fd = self._fd
            if fd is None:  # pragma: no cover - _roll always opens one
                raise StorageError("no open segment")
            view = memoryview(blob)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            self._writes += 1
            self._bytes_written += len(blob)
            segment = self._segments[-1]
            segment.size += len(blob)
            segment.max_index = max(segment.max_index, max_index)
            if sync:
                os.fdatasync(fd)
                self._fsyncs += 1
        except OSError as exc:
            self._failed = _io_error(exc, f"appending to {self._segments[-1].path}")
            raise self._failed from exc

    def _roll(self, hard_state_for_header: HardState) -> None:
        """Start a new segment whose first record repeats the current hard state."""
        if self._fd is not None:
            os.fdatasync(self._fd)
            self._fsyncs += 1
            os.close(self._fd)
            self._fd = None
        if self._segments and self._segments[-1].size < self.segment_bytes:
            # Reopen the existing last segment for appending (after recovery).
            segment = self._segments[-1]
            self._fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND)
            return
        seq = self._segments[-1].seq + 1 if self._segments else 1
        path = self.directory / f"wal-{seq:010d}.log"
        header = frame(codec.encode(WalSegmentHeader(seq, hard_state_for_header)))
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        self._fd = fd
        self._segments.append(_Segment(seq, path, 0, 0))
        view = memoryview(header)
        while view:
            view = view[os.write(fd, view) :]
        self._segments[-1].size = len(header)
        os.fdatasync(fd)
        _fsync_dir(self.directory)
        self._fsyncs += 2
        self._writes += 1
        self._bytes_written += len(header)

    def _write_snapshot_file(self, snapshot: Snapshot) -> None:
        """Write a snapshot atomically: temp file, fsync, rename, fsync the directory."""
        name = f"snap-{snapshot.meta.index:020d}-{snapshot.meta.term:020d}.snap"
        final = self.directory / name
        temp = self.directory / (name + ".tmp")
        blob = frame(codec.encode(snapshot))
        try:
            with open(temp, "wb") as handle:
                handle.write(blob)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, final)
            _fsync_dir(self.directory)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            self._failed = _io_error(exc, f"writing snapshot {final}")
            raise self._failed from exc
        self._fsyncs += 2
        self._writes += 1
        self._bytes_written += len(blob)
        previous = self._snapshot_path
        self._snapshot = snapshot
        self._snapshot_path = final
        if previous is not None and previous != final:
            # The new snapshot is durable, so the old one is no longer needed for recovery.
            with contextlib.suppress(OSError):
                os.unlink(previous)

    def save_snapshot(self, snapshot: Snapshot) -> None:
        """Persist a snapshot the shell took of its own state machine (the log is kept).

        Refuses to go backwards: a snapshot older than the current one is ignored.
        """
        self._check_usable()
        if self._snapshot is not None and snapshot.meta.index < self._snapshot.meta.index:
            return
        self._write_snapshot_file(snapshot)
        self._last_index = max(self._last_index, snapshot.meta.index)

    def compact(self, index: int) -> int:
        """Delete segments whose entries are all covered by the snapshot; returns how many.

        ``index`` is capped at the durable snapshot's index (never delete what only a
        not-yet-written snapshot would cover). The last segment is never deleted.
        """
        self._check_usable()
        limit = min(index, self.snapshot_index)
        removed = 0
        while len(self._segments) > 1 and self._segments[0].max_index <= limit:
            segment = self._segments[0]
            try:
                os.unlink(segment.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise _io_error(exc, f"deleting {segment.path}") from exc
            self._segments.pop(0)
            removed += 1
        if removed:
            try:
                _fsync_dir(self.directory)
            except OSError as exc:
                raise _io_error(exc, f"syncing {self.directory}") from exc
        return removed

    def close(self) -> None:
        """Close the open segment (idempotent). Unsynced appends are flushed by the OS only."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        self._closed = True

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def iter_records(path: Path) -> Iterator[tuple[int, object]]:
    """Debug helper: (offset, decoded record) for every valid record of a WAL segment."""
    data = path.read_bytes()
    scan = _scan(path, data, tail_may_tear=True)
    for offset, payload in scan.payloads:
        yield offset, _decode_record(path, offset, payload)
