"""Three real node processes on 127.0.0.2-4, concurrent clients, kill -9 and restarts.

The history every client observed is checked for linearizability (lincheck); then the whole
cluster is killed and restarted, and reads after the restart join the same history, so an
acknowledged write that did not survive makes the history non-linearizable.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from p2porch.consensus.lincheck import Op, OpKind, check
from p2porch.consensus.node_main import KvClient, KvClientError, LocalCluster

pytestmark = pytest.mark.slow

LOAD_S = 14.0
CLIENTS = 5
KEYS = ("x", "y", "z")


@pytest.fixture(params=[False, True], ids=["persist-then-send", "leader-parallel-append"])
async def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[LocalCluster]:
    extra = ("--leader-parallel-append",) if request.param else ()
    procs = LocalCluster(tmp_path, extra_args=extra)
    try:
        await procs.start_all()
        yield procs
    finally:
        procs.stop_all()


class Recorder:
    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.completed = 0
        self.pending = 0
        self.acked_unique: dict[str, bytes] = {}  # write-once keys whose put was acknowledged

    async def run(self, client: KvClient, kind: OpKind, key: str, **kw: bytes | None) -> None:
        call = trio.current_time()
        value = kw.get("value")
        expected = kw.get("expected")
        try:
            if kind is OpKind.PUT:
                assert value is not None
                await client.put(key, value)
                result: bytes | bool | None = None
            elif kind is OpKind.GET:
                result = await client.get(key)
            else:
                assert value is not None
                result = (await client.cas(key, expected, value)).ok
        except KvClientError:
            self.pending += 1
            if kind is not OpKind.GET:  # a read that never returned has no effect
                self.ops.append(Op(client.client_id, key, kind, value, None, call, None, expected))
            return
        self.completed += 1
        self.ops.append(
            Op(client.client_id, key, kind, value, result, call, trio.current_time(), expected)
        )


async def client_loop(cluster: LocalCluster, rec: Recorder, index: int, deadline: float) -> None:
    rng = random.Random(index)
    seen: dict[str, bytes | None] = {}
    async with KvClient(cluster.clients, f"c{index}", timeout_s=4.0) as client:
        n = 0
        while trio.current_time() < deadline:
            n += 1
            key = rng.choice(KEYS)
            roll = rng.random()
            if roll < 0.1:
                # A write-once key: if acknowledged, it must be there after every restart.
                unique, value = f"u-{index}-{n}", b"u%d" % n
                try:
                    if (await client.put(unique, value)).ok:
                        rec.acked_unique[unique] = value
                except KvClientError:
                    pass
            elif roll < 0.4:
                value = b"c%d-%d" % (index, n)
                await rec.run(client, OpKind.PUT, key, value=value)
                seen[key] = value
            elif roll < 0.75:
                await rec.run(client, OpKind.GET, key)
                last = rec.ops[-1] if rec.ops else None
                if last is not None and last.client == client.client_id and last.ret is not None:
                    seen[key] = last.result if isinstance(last.result, bytes) else None
            else:
                value = b"c%d-%d" % (index, n)
                await rec.run(client, OpKind.CAS, key, value=value, expected=seen.get(key))


async def chaos(cluster: LocalCluster, deadline: float) -> list[str]:
    rng = random.Random(99)
    killed: list[str] = []
    round_no = 0
    while trio.current_time() + 4 < deadline:
        await trio.sleep(2.0)
        round_no += 1
        leader = await cluster.leader(timeout_s=3.0)
        victim = leader if (round_no % 2 == 1 and leader) else rng.choice(cluster.ids)
        cluster.kill9(victim)
        killed.append(victim)
        await trio.sleep(0.6)
        await cluster.start(victim)
    return killed


async def test_linearizable_under_kill9_and_writes_survive_restart(cluster: LocalCluster) -> None:
    assert await cluster.leader() is not None
    rec = Recorder()
    deadline = trio.current_time() + LOAD_S
    killed: list[str] = []

    async def run_chaos() -> None:
        killed.extend(await chaos(cluster, deadline))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_chaos)
        for i in range(CLIENTS):
            nursery.start_soon(client_loop, cluster, rec, i, deadline)
    assert len(killed) >= 2
    assert rec.completed > 200, f"too little progress: {rec.completed} ops"

    # Reads before and after a whole-cluster kill -9 join the history.
    async with KvClient(cluster.clients, "final", timeout_s=10.0) as reader:
        for key in KEYS:
            await rec.run(reader, OpKind.GET, key)
        before = {key: await reader.get(key) for key in KEYS}
    cluster.stop_all()
    await cluster.start_all()
    async with KvClient(cluster.clients, "after", timeout_s=10.0) as reader:
        for key in KEYS:
            await rec.run(reader, OpKind.GET, key)
        after = {key: await reader.get(key) for key in KEYS}
        lost = [k for k, v in rec.acked_unique.items() if await reader.get(k) != v]
    assert before == after
    assert len(rec.acked_unique) > 20
    assert not lost, f"{len(lost)} acknowledged writes lost: {lost[:5]}"
    assert any(v is not None for v in after.values())

    result = check(rec.ops, max_steps_per_key=3_000_000)
    print(
        f"ops={len(rec.ops)} completed={rec.completed} pending={rec.pending} killed={killed} "
        f"unique acked writes={len(rec.acked_unique)} "
        f"lincheck steps={result.steps}"
    )
    assert result.ok, (
        f"not linearizable: failed={result.failed_keys} unknown={result.unknown_keys} "
        f"({len(rec.ops)} ops, {rec.pending} pending)"
    )
    # The checker is not vacuous on this very history: a stale final read is caught.
    final = rec.ops[-1]
    stale = next(
        op.value
        for op in reversed(rec.ops)
        if op.key == final.key and op.kind is OpKind.PUT and op.value != final.result
    )
    tampered = [
        *rec.ops[:-1],
        Op("after", final.key, OpKind.GET, None, stale, final.call, final.ret),
    ]
    assert not check(tampered, max_steps_per_key=3_000_000).ok
