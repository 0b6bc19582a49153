"""The trio shell against an in-memory engine, on trio's MockClock (virtual time).

The fake engine keeps containers in a dict and sends die/start/destroy events through a
memory channel, so these tests check the shell's wiring -- waking on events and timers,
bounded concurrency, outcomes fed back to the planner, engine outages -- deterministically.
Times asserted here are MockClock times, never the wall clock.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import attrs
import pytest
import trio
import trio.testing

from p2porch.node import runtime as rt
from p2porch.node.errors import EngineUnavailable, ImageUnavailable
from p2porch.node.reconcile_core import ReconcilerConfig, ReplicaState, ReplicaStatus
from p2porch.node.reconciler import Reconciler
from p2porch.node.runtime import (
    ContainerEvent,
    ContainerInfo,
    ContainerRequest,
    ContainerState,
    DockerRuntime,
    EventKind,
    PublishedPort,
)
from p2porch.node.spec import App, AppSpec, ObjectMeta, PortSpec, Protocol
from p2porch.node.state import Placement

NODE = "n1"
ADDRESS = "127.0.0.2"
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


class FakeEvents:
    def __init__(self, receive: trio.MemoryReceiveChannel[ContainerEvent]) -> None:
        self._receive = receive

    async def __aenter__(self) -> FakeEvents:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def __aiter__(self) -> FakeEvents:
        return self

    async def __anext__(self) -> ContainerEvent:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None


class FakeEngine:
    """Just enough of DockerRuntime for the reconciler, with its clock on trio's."""

    def __init__(self) -> None:
        self.node_name = NODE
        self.advertise_address = ADDRESS
        self.containers: dict[str, ContainerInfo] = {}
        self.images = {"demo:1"}
        self.down = False
        self.create_delay_s = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self.created: list[str] = []
        self.restarted: list[tuple[str, float]] = []
        self.removed: list[str] = []
        self._ids = itertools.count(1)
        self._send, self._receive = trio.open_memory_channel[ContainerEvent](1000)
        self.api = self  # run_engine hands "the client"; client.api.start is ours

    def _now(self) -> datetime:
        return EPOCH + timedelta(seconds=trio.current_time())

    def _event(self, kind: EventKind, info: ContainerInfo, exit_code: int | None = None) -> None:
        self._send.send_nowait(
            ContainerEvent(
                kind, info.id, info.name, info.app, info.namespace, info.replica,
                info.generation, 0, exit_code,
            )
        )  # fmt: skip

    def _check(self) -> None:
        if self.down:
            raise EngineUnavailable("the Docker engine did not answer: fake outage")

    def add(self, replica: str, app: str = "web", generation: int = 1, node: str = NODE) -> str:
        cid = f"c{next(self._ids)}"
        self.containers[cid] = ContainerInfo(
            id=cid, name=f"p2porch_{node}_default_{replica}_g{generation}", image="demo:1",
            state=ContainerState.RUNNING, app=app, namespace="default", replica=replica,
            generation=generation, exit_code=None, oom_killed=False, started_at=self._now(),
            finished_at=None, restart_count=0,
            ports=(PublishedPort(8080, Protocol.TCP, ADDRESS, 32000 + len(self.containers)),),
            labels=((rt.LABEL_NODE, node),),
        )  # fmt: skip
        return cid

    def crash(self, cid: str, code: int) -> None:
        info = attrs.evolve(
            self.containers[cid],
            state=ContainerState.EXITED,
            exit_code=code,
            finished_at=self._now(),
        )
        self.containers[cid] = info
        self._event(EventKind.DIE, info, code)

    # -- the DockerRuntime surface the reconciler uses

    async def list_owned(self) -> list[ContainerInfo]:
        await trio.sleep(0.01)
        self._check()
        return [c for c in self.containers.values() if (rt.LABEL_NODE, NODE) in c.labels]

    def events(self) -> FakeEvents:
        return FakeEvents(self._receive)

    async def has_image(self, ref: str) -> bool:
        return ref in self.images

    async def ensure_image(self, ref: str) -> str:
        await trio.sleep(0.1)
        if ref not in self.images:
            raise ImageUnavailable(ref, "no registry answers")
        return "sha256:feed"

    async def create_and_start(self, request: ContainerRequest) -> ContainerInfo:
        self._check()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await trio.sleep(self.create_delay_s)
        finally:
            self.in_flight -= 1
        cid = self.add(request.replica, request.app, request.generation)
        self.created.append(request.replica)
        self._event(EventKind.START, self.containers[cid])
        return self.containers[cid]

    async def inspect(self, container_id: str) -> ContainerInfo:
        return self.containers[container_id]

    async def run_engine(self, fn: Callable[[Any], Any], what: str = "") -> Any:
        return fn(self)

    def start(self, container_id: str) -> None:  # client.api.start
        info = attrs.evolve(
            self.containers[container_id], state=ContainerState.RUNNING, started_at=self._now()
        )
        self.containers[container_id] = info
        self.restarted.append((container_id, trio.current_time()))
        self._event(EventKind.START, info)

    async def stop(self, container_id: str, timeout_s: int | None = None) -> None:
        info = self.containers[container_id]
        self.containers[container_id] = attrs.evolve(info, state=ContainerState.EXITED)

    async def remove(self, container_id: str, *, missing_ok: bool = False) -> None:
        info = self.containers.pop(container_id)
        self.removed.append(container_id)
        self._event(EventKind.DESTROY, info)


def web(replicas: int = 2, image: str = "demo:1", generation: int = 1) -> App:
    spec = AppSpec(image=image, ports=(PortSpec(8080),), replicas=replicas)
    return App(ObjectMeta("web"), spec).with_generation(generation)


def placements(app: App, *slots: int) -> list[Placement]:
    return [Placement("default", "web", s, NODE, app.meta.generation) for s in slots]


@asynccontextmanager
async def reconciling(
    engine: FakeEngine, config: ReconcilerConfig | None = None
) -> AsyncIterator[Reconciler]:
    rec = Reconciler(cast(DockerRuntime, engine), NODE, ADDRESS, config or ReconcilerConfig())
    async with trio.open_nursery() as nursery:
        await nursery.start(rec.run)
        yield rec
        nursery.cancel_scope.cancel()


async def until(
    rec: Reconciler, predicate: Callable[[list[ReplicaStatus]], bool], timeout_s: float = 3600
) -> list[ReplicaStatus]:
    version = rec.status_version
    with trio.fail_after(timeout_s):
        while not predicate(rec.statuses()):
            version = await rec.wait_statuses_changed(version)
    return rec.statuses()


def restarted_times(count: int) -> Callable[[list[ReplicaStatus]], bool]:
    return lambda s: s[0].restarts == count and s[0].ready


async def engine_until(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(3600):
        while not predicate():
            await trio.sleep(0.01)


def running(count: int) -> Callable[[list[ReplicaStatus]], bool]:
    return lambda s: len(s) == count and all(x.state is ReplicaState.RUNNING for x in s)


async def test_nothing_is_removed_before_the_first_desired_set(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine()
    kept = engine.add("web-0")
    async with reconciling(engine) as rec:
        await trio.sleep(120)  # many resync periods of virtual time
        assert kept in engine.containers and rec.statuses() == [] and rec.passes == 0
        app = web(1)
        rec.set_desired(placements(app, 0), [app])
        (status,) = await until(rec, running(1))
    assert status.container_id == kept and engine.created == []  # adopted


async def test_crash_loop_waits_the_doubling_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine()
    app = web(1)
    async with reconciling(engine) as rec:
        rec.set_desired(placements(app, 0), [app])
        (status,) = await until(rec, running(1))
        cid = status.container_id
        for n in range(1, 5):
            crashed_at = trio.current_time()
            engine.crash(cid, 3)
            await until(rec, restarted_times(n))
            (restarted_id, at) = engine.restarted[-1]
            assert restarted_id == cid
            # Virtual time: the restart came exactly after the back-off (plus the listing).
            assert at - crashed_at == pytest.approx(10 * 2 ** (n - 1), abs=0.1)
    assert engine.created == ["web-0"]


async def test_actions_run_concurrently_but_bounded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine()
    engine.create_delay_s = 1.0
    app = web(20)
    async with reconciling(engine, ReconcilerConfig(max_parallel_actions=4)) as rec:
        rec.set_desired(placements(app, *range(20)), [app])
        await until(rec, running(20))
    assert engine.max_in_flight == 4
    assert sorted(engine.created) == sorted(f"web-{i}" for i in range(20))


async def test_engine_outage_marks_replicas_unknown_then_recovers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine()
    app = web(2)
    async with reconciling(engine) as rec:
        rec.set_desired(placements(app, 0, 1), [app])
        await until(rec, running(2))
        engine.down = True
        rec.poke()
        statuses = await until(
            rec, lambda s: all(x.state is ReplicaState.UNKNOWN for x in s) and len(s) == 2
        )
        assert statuses[0].reason.startswith("engine unavailable: ")
        engine.down = False
        await until(rec, running(2))
    assert len(engine.created) == 2  # the outage restarted nothing


async def test_missing_image_fails_terminally_until_it_appears(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine()
    app = web(1, image="late:1")
    async with reconciling(engine) as rec:
        rec.set_desired(placements(app, 0), [app])
        (status,) = await until(rec, lambda s: len(s) == 1 and s[0].terminal)
        assert status.state is ReplicaState.FAILED
        assert status.reason.startswith("image late:1 unavailable: no registry answers")
        assert len(rec.terminal_facts()) == 1
        engine.images.add("late:1")  # e.g. built locally meanwhile
        (status,) = await until(rec, running(1))
        assert not status.terminal and rec.terminal_facts() == []


async def test_scale_down_generation_change_and_shutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine()
    app = web(3)
    async with reconciling(engine) as rec:
        rec.set_desired(placements(app, 0, 1, 2), [app])
        first = await until(rec, running(3))
        rec.set_desired(placements(app, 0, 1), [app])
        await until(rec, running(2))
        await engine_until(lambda: first[2].container_id in engine.removed)
        newer = web(2, generation=2)
        rec.set_desired(placements(newer, 0, 1), [newer])
        second = await until(rec, lambda s: running(2)(s) and all(x.generation == 2 for x in s))
        await engine_until(lambda: {s.container_id for s in first[:2]} <= set(engine.removed))
        assert {c.generation for c in engine.containers.values()} == {2}
        await rec.shutdown_all()
        assert engine.containers == {} and rec.statuses() == []
        await trio.sleep(60)
        assert engine.containers == {}  # halted until the next desired set
    assert len(second) == 2


async def test_status_waiters_see_each_change_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine()
    app = web(1, generation=1)
    async with reconciling(engine) as rec:
        version = rec.status_version
        rec.set_desired(placements(app, 0), [app])
        newer = await rec.wait_statuses_changed(version)
        assert newer > version
        await until(rec, running(1))
        settled = rec.status_version
        await trio.sleep(60)  # resyncs with nothing new: no spurious changes
        assert rec.status_version == settled
