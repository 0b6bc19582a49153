"""Restart recovery time of a Raft node whose WAL holds 100,000 entries (target <= 2 s).

Run from the repository root::

    python3 -m benchmarks.raft_recovery [--entries 100000] [--value-bytes 256] [--repeats 3]

Two cases, each a single-voter WAL of committed KV puts written the way the shell writes it:
"node defaults" (a KV snapshot + compaction every ``--snapshot-every`` entries, so the last
10,000 entries are replayed on restart, though all 100,000 records are still on disk in one
64 MiB segment) and "worst case" (no snapshot at all: every entry is decoded and applied).

What is measured (figures are printed, never asserted):

1. ``Storage.open`` + ``load`` in this process: read every segment, check every record's
   checksums, decode what the snapshot does not cover, rebuild the log;
2. a real ``node_main`` process restarted on a fresh copy of that data directory, median of
   ``--repeats``: wall time from ``exec`` to ``READY`` (ports open, core built) and to
   ``applied_index == entries`` (every entry replayed into the KV state machine), polled over
   the client port.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import trio

from p2porch.common import codec
from p2porch.consensus.kv import KvCommand, KvPut, KvStateMachine
from p2porch.consensus.messages import (
    Entry,
    EntryKind,
    HardState,
    Membership,
    PersistentState,
    Snapshot,
    SnapshotMeta,
)
from p2porch.consensus.node_main import KvClient, LocalCluster
from p2porch.consensus.storage import Storage


def build_wal(directory: Path, entries: int, value_bytes: int, snapshot_every: int) -> float:
    """Write a single-node log of ``entries`` committed KV puts, as the shell would (a KV
    snapshot + compaction every ``snapshot_every`` entries, 0 = never); returns seconds."""
    started = time.perf_counter()
    membership = Membership(frozenset({"a"}))
    machine = KvStateMachine()
    with Storage.open(directory) as store:
        bootstrap = PersistentState.bootstrap(membership)
        assert bootstrap.snapshot is not None
        store.save_snapshot(bootstrap.snapshot)
        value = b"v" * value_bytes
        batch: list[Entry] = []
        for index in range(1, entries + 1):
            command = KvCommand("bench", index, KvPut(f"key-{index % 1000}", value))
            data = codec.encode(command)
            batch.append(Entry(1, index, EntryKind.NORMAL, data))
            if snapshot_every:
                machine.apply(data)
            if len(batch) == 1000 or index == entries:
                store.save(HardState(1, "a", index), batch, None, sync=True)
                batch = []
            # The last entries stay un-snapshotted: a restart must replay them (worst case).
            if snapshot_every and index % snapshot_every == 0 and index < entries:
                meta = SnapshotMeta(index, 1, membership)
                store.save_snapshot(Snapshot(meta, machine.snapshot()))
                store.compact(index)
    return time.perf_counter() - started


def measure_load(directory: Path) -> tuple[float, int]:
    started = time.perf_counter()
    with Storage.open(directory) as store:
        state = store.load()
    return time.perf_counter() - started, len(state.entries)


async def measure_process(root: Path, entries: int) -> tuple[float, float]:
    cluster = LocalCluster(root, ids=("a",), hosts=("127.0.0.2",))
    try:
        started = trio.current_time()
        await cluster.start("a", timeout_s=60)
        ready_s = trio.current_time() - started
        async with KvClient(cluster.clients, "probe") as client:
            while True:
                status = await client.status("a")
                if status is not None and status.applied_index >= entries:
                    break
                await trio.sleep(0.01)
        applied_s = trio.current_time() - started
    finally:
        cluster.stop_all()
    return ready_s, applied_s


def run_case(
    label: str, entries: int, value_bytes: int, snapshot_every: int, repeats: int
) -> float:
    with tempfile.TemporaryDirectory(prefix="raft-recovery-") as tmp:
        root = Path(tmp)
        data = root / "data-a"
        build_s = build_wal(data, entries, value_bytes, snapshot_every)
        size = sum(p.stat().st_size for p in data.iterdir())
        print(f"[{label}]")
        print(f"  WAL: {entries} entries, {size / 1e6:.1f} MB on disk, written in {build_s:.2f} s")
        load_s, loaded = measure_load(data)
        print(f"  Storage.open+load (in process): {load_s:.3f} s, {loaded} entries after snapshot")
        pristine = root / "pristine"
        shutil.copytree(data, pristine)
        runs = []
        for _ in range(repeats):
            # Every restart starts from the same files: a restarted node may take a snapshot
            # of its own, which would make the next restart cheaper.
            shutil.rmtree(data)
            shutil.copytree(pristine, data)
            runs.append(trio.run(measure_process, root, entries))
        runs.sort(key=lambda run: run[1])
        applied = sorted(a for _, a in runs)
        ready_s, applied_s = runs[len(runs) // 2]
        print(
            f"  node process restart (median of {repeats}): READY {ready_s:.3f} s, all applied "
            f"{applied_s:.3f} s (min {applied[0]:.3f}, max {applied[-1]:.3f})"
        )
        return applied[len(applied) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--value-bytes", type=int, default=256)
    parser.add_argument("--snapshot-every", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3, help="restarts per case (median)")
    args = parser.parse_args()
    default_s = run_case(
        f"node defaults: KV snapshot every {args.snapshot_every} entries",
        args.entries,
        args.value_bytes,
        args.snapshot_every,
        args.repeats,
    )
    worst_s = run_case(
        "worst case: no snapshot, every entry replayed",
        args.entries,
        args.value_bytes,
        0,
        args.repeats,
    )
    print(
        f"target <= 2 s: node defaults {default_s:.2f} s "
        f"({'meets' if default_s <= 2 else 'misses'}), "
        f"no-snapshot worst case {worst_s:.2f} s ({'meets' if worst_s <= 2 else 'misses'})"
    )


if __name__ == "__main__":
    main()
