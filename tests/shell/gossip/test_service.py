"""Shell tests (tier 3): real GossipService instances over an in-memory network, MockClock.

Every wait is on *virtual* time (MockClock jumps whenever all tasks sleep), so these tests are
fast and never depend on the machine's speed. They check behaviour, never durations.
"""

from __future__ import annotations

import random
import stat
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from p2porch.common import codec
from p2porch.gossip.config import GossipConfig
from p2porch.gossip.errors import JoinFailed, MetaTooLarge
from p2porch.gossip.keyring import (
    OVERHEAD_BYTES,
    PURPOSE_TCP,
    PURPOSE_UDP,
    Keyring,
    KeyringError,
    load_keyring,
)
from p2porch.gossip.messages import Event, EventKind, MemberState
from p2porch.gossip.service import (
    GossipService,
    PushPullReply,
    Resync,
    ShellLimits,
    StreamPingRequest,
)

from .fakenet import MemoryNetwork

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))
CONFIG = GossipConfig.local()


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


class Cluster:
    def __init__(self, nursery: trio.Nursery, network: MemoryNetwork) -> None:
        self.nursery = nursery
        self.network = network
        self.services: dict[str, GossipService] = {}
        self.scopes: dict[str, trio.CancelScope] = {}

    async def start(
        self,
        name: str,
        seeds: tuple[str, ...] = (),
        *,
        key: bytes = KEY_A,
        limits: ShellLimits | None = None,
        meta: bytes = b"",
    ) -> GossipService:
        index = len(self.services) + 2
        service = GossipService(
            CONFIG,
            name,
            (f"127.0.0.{index}", 7946),
            Keyring(key),
            meta,
            seeds,
            limits=limits,
            rng=random.Random(index),
            transport_factory=self.network.bind,
        )
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await service.run(task_status=task_status)

        await self.nursery.start(run)
        self.services[name] = service
        self.scopes[name] = scope
        return service

    def crash(self, name: str) -> None:
        """What kill -9 looks like from outside: the node vanishes mid-flight."""
        self.network.isolate(self.services[name].addr)
        self.scopes[name].cancel()


@asynccontextmanager
async def cluster() -> AsyncIterator[Cluster]:
    async with trio.open_nursery() as nursery:
        yield Cluster(nursery, MemoryNetwork())
        nursery.cancel_scope.cancel()


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Poll in virtual time; fail the test if the predicate never holds."""
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.05)


def alive_names(service: GossipService) -> set[str]:
    return {m.name for m in service.members() if m.state == MemberState.ALIVE}


def state_of(service: GossipService, name: str) -> MemberState | None:
    member = service.member(name)
    return None if member is None else member.state


async def test_three_nodes_join_through_one_seed(autojump_clock: trio.testing.MockClock) -> None:
    async with cluster() as c:
        a = await c.start("a")
        b = await c.start("b", (a.addr,))
        cc = await c.start("c", (a.addr,))
        everyone = {"a", "b", "c"}
        await wait_until(lambda: all(alive_names(s) == everyone for s in (a, b, cc)))
        assert b.stats()["push_pulls_ok"] >= 1
        assert a.stats()["bad_auth"] == 0


async def test_join_call_returns_after_first_push_pull(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with cluster() as c:
        a = await c.start("a")
        b = await c.start("b")
        await b.join([a.addr])
        assert "a" in {m.name for m in b.members()}


async def test_join_with_no_reachable_seed_fails(autojump_clock: trio.testing.MockClock) -> None:
    async with cluster() as c:
        b = await c.start("b", limits=ShellLimits(join_timeout_s=3.0))
        with pytest.raises(JoinFailed):
            await b.join(["127.0.0.99:7946"])
        assert b.stats()["push_pulls_failed"] >= 1


async def test_meta_update_is_seen_by_everyone(autojump_clock: trio.testing.MockClock) -> None:
    async with cluster() as c:
        a = await c.start("a", meta=b"v1")
        b = await c.start("b", (a.addr,))
        cc = await c.start("c", (a.addr,))
        await wait_until(lambda: all(len(alive_names(s)) == 3 for s in (a, b, cc)))
        seen: list[Event] = []

        async def collect() -> None:
            async for item in b.events():
                if isinstance(item, Event):
                    seen.append(item)

        c.nursery.start_soon(collect)
        a.set_meta(b"v2")

        def meta_seen(s: GossipService) -> bool:
            member = s.member("a")
            return member is not None and member.meta == b"v2"

        await wait_until(lambda: meta_seen(b) and meta_seen(cc))
        await wait_until(
            lambda: any(e.kind == EventKind.UPDATED and e.member.name == "a" for e in seen)
        )
        with pytest.raises(MetaTooLarge):
            a.set_meta(b"x" * (CONFIG.max_meta_bytes + 1))


async def test_crashed_node_is_declared_dead(autojump_clock: trio.testing.MockClock) -> None:
    async with cluster() as c:
        a = await c.start("a")
        b = await c.start("b", (a.addr,))
        cc = await c.start("c", (a.addr,))
        await wait_until(lambda: all(len(alive_names(s)) == 3 for s in (a, b, cc)))
        c.crash("c")
        await wait_until(
            lambda: state_of(a, "c") == MemberState.DEAD and state_of(b, "c") == MemberState.DEAD
        )
        assert alive_names(a) == alive_names(b) == {"a", "b"}


async def test_graceful_leave_is_seen_as_left(autojump_clock: trio.testing.MockClock) -> None:
    async with cluster() as c:
        a = await c.start("a")
        b = await c.start("b", (a.addr,))
        cc = await c.start("c", (a.addr,))
        await wait_until(lambda: all(len(alive_names(s)) == 3 for s in (a, b, cc)))
        await cc.leave()
        c.crash("c")
        await wait_until(
            lambda: state_of(a, "c") == MemberState.LEFT and state_of(b, "c") == MemberState.LEFT
        )


async def test_udp_garbage_is_dropped_and_counted(autojump_clock: trio.testing.MockClock) -> None:
    async with cluster() as c:
        a = await c.start("a")
        b = await c.start("b", (a.addr,))
        await wait_until(lambda: len(alive_names(a)) == 2)
        before = a.stats()
        rng = random.Random(7)
        for size in (0, 1, 5, 33, 100, 1399):
            c.network.inject(a.addr, rng.randbytes(size))
        # Oversize: dropped before any crypto is attempted.
        c.network.inject(a.addr, b"\x01" * (CONFIG.udp_mtu_bytes + 10))
        # Correctly sealed but not a gossip message: the core drops and counts it.
        c.network.inject(a.addr, Keyring(KEY_A).seal(b"\xc1 not msgpack", PURPOSE_UDP))
        # Sealed for TCP, replayed on UDP: refused by the associated data.
        c.network.inject(a.addr, Keyring(KEY_A).seal(b"x", PURPOSE_TCP))
        await trio.sleep(1.0)
        after = a.stats()
        assert after["bad_auth"] - before["bad_auth"] == 7
        assert after["udp_oversize"] - before["udp_oversize"] == 1
        assert after["bad_packets"] > before["bad_packets"]
        # Still healthy.
        await trio.sleep(5.0)
        assert alive_names(a) == alive_names(b) == {"a", "b"}


async def test_tcp_garbage_slow_and_oversize_clients_are_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = ShellLimits(tcp_io_timeout_s=2.0, max_frame_bytes=4096)
    async with cluster() as c:
        a = await c.start("a", limits=limits)
        b = await c.start("b", (a.addr,), limits=limits)
        await wait_until(lambda: len(alive_names(a)) == 2)
        before = a.stats()

        # 1. Plain garbage in a well-formed frame.
        s1 = await c.network.raw_connect(a.addr)
        await s1.send_all(struct.pack(">I", 5) + b"hello")
        # 2. A length prefix beyond max_frame_bytes.
        s2 = await c.network.raw_connect(a.addr)
        await s2.send_all(struct.pack(">I", 10_000_000))
        # 3. A slow client that sends half a header and then nothing.
        s3 = await c.network.raw_connect(a.addr)
        await s3.send_all(b"\x00\x00")
        # 4. Correctly sealed, but the payload is a reply, not a request.
        s4 = await c.network.raw_connect(a.addr)
        sealed = Keyring(KEY_A).seal(codec.encode(PushPullReply(b"")), PURPOSE_TCP)
        await s4.send_all(struct.pack(">I", len(sealed)) + sealed)
        # 5. A sealed frame under a foreign key.
        s5 = await c.network.raw_connect(a.addr)
        foreign = Keyring(KEY_B).seal(codec.encode(StreamPingRequest(b"x")), PURPOSE_TCP)
        await s5.send_all(struct.pack(">I", len(foreign)) + foreign)

        await trio.sleep(limits.tcp_io_timeout_s + 1.0)
        after = a.stats()
        assert after["tcp_bad_frames"] - before["tcp_bad_frames"] >= 4
        assert after["tcp_timeouts"] - before["tcp_timeouts"] >= 1
        assert after["bad_auth"] - before["bad_auth"] >= 2
        for stream in (s1, s2, s3, s4, s5):
            await trio.aclose_forcefully(stream)
        # And push-pull still works afterwards.
        await b.join([a.addr])
        assert alive_names(a) == {"a", "b"}


async def test_tcp_connections_beyond_the_limit_are_rejected(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = ShellLimits(max_tcp_connections=2, tcp_io_timeout_s=5.0)
    async with cluster() as c:
        a = await c.start("a", limits=limits)
        idle = [await c.network.raw_connect(a.addr) for _ in range(4)]
        await trio.sleep(0.5)
        assert a.stats()["tcp_rejected"] == 2
        await trio.sleep(limits.tcp_io_timeout_s + 1.0)
        assert a.stats()["tcp_timeouts"] == 2
        for stream in idle:
            await trio.aclose_forcefully(stream)


async def test_peer_under_a_foreign_key_cannot_join(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with cluster() as c:
        a = await c.start("a")
        intruder = await c.start("x", key=KEY_B, limits=ShellLimits(join_timeout_s=3.0))
        with pytest.raises(JoinFailed):
            await intruder.join([a.addr])
        await trio.sleep(2.0)
        assert a.stats()["bad_auth"] >= 1
        assert {m.name for m in a.members()} == {"a"}
        assert {m.name for m in intruder.members()} == {"x"}


async def test_key_rotation_keeps_everyone_alive(autojump_clock: trio.testing.MockClock) -> None:
    async with cluster() as c:
        nodes = [await c.start("a")]
        nodes += [await c.start(n, (nodes[0].addr,)) for n in ("b", "c")]
        await wait_until(lambda: all(len(alive_names(s)) == 3 for s in nodes))
        suspicious: list[Event] = []

        async def watch(service: GossipService) -> None:
            async for item in service.events():
                if isinstance(item, Event) and item.kind in (EventKind.SUSPECT, EventKind.DEAD):
                    suspicious.append(item)

        for s in nodes:
            c.nursery.start_soon(watch, s)
        steps: list[Callable[[GossipService], None]] = [
            lambda s: s.install_key(KEY_B),
            lambda s: s.use_key(KEY_B),
            lambda s: s.remove_key(KEY_A),
        ]
        for step in steps:
            for s in nodes:
                step(s)
                await trio.sleep(0.3)  # nodes change at different times, as in real life
            await trio.sleep(2.0)
            assert all(len(alive_names(s)) == 3 for s in nodes)
        assert suspicious == []
        assert all(s.keyring.installed_keys() == (KEY_B,) for s in nodes)
        assert all(s.stats()["bad_auth"] == 0 for s in nodes)


async def test_slow_consumer_gets_a_resync(autojump_clock: trio.testing.MockClock) -> None:
    async with cluster() as c:
        a = await c.start("a", limits=ShellLimits(event_buffer=1))
        others = [await c.start(n, (a.addr,)) for n in ("b", "c", "d")]
        await wait_until(lambda: len(alive_names(a)) == 4)
        assert a.stats()["events_dropped"] >= 1
        items: list[Event | Resync] = []
        async for item in a.events():
            items.append(item)
            if isinstance(item, Resync):
                break
        resync = items[-1]
        assert isinstance(resync, Resync)
        assert resync.dropped == a.stats()["events_dropped"]
        assert {m.name for m in resync.members} == {"a", "b", "c", "d"}
        assert others


async def test_events_has_a_single_consumer(autojump_clock: trio.testing.MockClock) -> None:
    async with cluster() as c:
        a = await c.start("a")

        async def consume() -> None:
            async for _ in a.events():
                pass

        c.nursery.start_soon(consume)
        await trio.sleep(0.1)
        with pytest.raises(RuntimeError):
            await a.events().__anext__()


async def test_sealed_datagrams_fit_the_mtu(autojump_clock: trio.testing.MockClock) -> None:
    """The shell reserves the keyring's overhead in the core's budget, so no sealed datagram
    exceeds udp_mtu_bytes even when many rumours (with big metadata) are piggybacked."""
    big_meta = b"m" * CONFIG.max_meta_bytes
    async with cluster() as c:
        first = await c.start("n0", meta=big_meta)
        assert first.config.encryption_overhead_bytes == OVERHEAD_BYTES
        nodes = [first] + [
            await c.start(f"n{i}", (first.addr,), meta=big_meta) for i in range(1, 12)
        ]
        await wait_until(lambda: all(len(alive_names(s)) == 12 for s in nodes))
        # Rumours were packed (two big Alives in one datagram) and still fit.
        assert 2 * CONFIG.max_meta_bytes < c.network.largest_datagram <= CONFIG.udp_mtu_bytes
        assert all(s.stats()["udp_oversize"] == 0 for s in nodes)


async def test_keyring_changes_are_persisted(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    path = tmp_path / "gossip.keyring"
    network = MemoryNetwork()
    service = GossipService(
        CONFIG,
        "p",
        ("127.0.0.2", 7946),
        Keyring(KEY_A),
        keyring_path=str(path),
        transport_factory=network.bind,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        service.install_key(KEY_B)
        assert set(load_keyring(path).installed_keys()) == {KEY_A, KEY_B}
        service.use_key(KEY_B)
        service.remove_key(KEY_A)
        loaded = load_keyring(path)
        assert loaded.primary == KEY_B and loaded.installed_keys() == (KEY_B,)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with pytest.raises(KeyringError):
            service.remove_key(KEY_B)  # the primary
        service.stop()


async def test_real_loopback_sockets_join_and_meta() -> None:
    """Two services on real UDP/TCP sockets (127.0.0.2/.3): the real transport works.

    Real time, not MockClock (the clock must not jump while packets are in the kernel); the
    waits are generous upper bounds, and the test asserts only on what happened.
    """
    async with trio.open_nursery() as nursery:
        a = GossipService(CONFIG, "ra", ("127.0.0.2", 0), Keyring(KEY_A))
        await nursery.start(a.run)
        b = GossipService(CONFIG, "rb", ("127.0.0.3", 0), Keyring(KEY_A), b"m1", (a.addr,))
        await nursery.start(b.run)
        await wait_until(lambda: alive_names(a) == alive_names(b) == {"ra", "rb"}, 20.0)
        b.set_meta(b"m2")
        await wait_until(lambda: getattr(a.member("rb"), "meta", None) == b"m2", 20.0)
        assert a.stats()["udp_bytes_in"] > 0 and b.stats()["udp_bytes_out"] > 0
        assert a.addr.startswith("127.0.0.2:") and b.addr.startswith("127.0.0.3:")
        nursery.cancel_scope.cancel()
