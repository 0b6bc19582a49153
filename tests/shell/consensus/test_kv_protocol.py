"""The node's client protocol (KvServer / KvClient) over in-memory streams, virtual time."""

from __future__ import annotations

import random
from pathlib import Path

import trio
import trio.testing

from p2porch.common import codec
from p2porch.consensus.kv import KvStateMachine
from p2porch.consensus.messages import Membership
from p2porch.consensus.node_main import KvClient, KvResponse, KvServer, KvStatusRequest
from p2porch.consensus.service import RaftService, ServiceConfig
from p2porch.consensus.storage import Storage
from p2porch.consensus.transport import FrameReader, MemoryNetwork, encode_frame

CONFIG = ServiceConfig(raft=ServiceConfig.local().raft, storage_in_thread=False)
VOTERS = Membership(frozenset({"a", "b", "c"}))


async def start_node(
    nursery: trio.Nursery, network: MemoryNetwork, root: Path, node_id: str
) -> KvServer:
    machine = KvStateMachine()
    service = RaftService(
        node_id,
        config=CONFIG,
        storage=Storage.open(root / node_id),
        state_machine=machine,
        transport=network.transport(f"raft-{node_id}:1"),
        listen=f"raft-{node_id}:1",
        peers={n: f"raft-{n}:1" for n in "abc"},
        bootstrap=VOTERS,
        rng=random.Random(node_id),
    )
    await nursery.start(service.run)
    server = KvServer(service, machine)
    transport = network.transport(f"kv-{node_id}:1")
    await nursery.start(transport.serve, f"kv-{node_id}:1", server.handle)
    return server


async def test_client_follows_the_leader_and_gets_exactly_once_results(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    network = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        servers = {n: await start_node(nursery, network, tmp_path, n) for n in "abc"}
        addresses = {n: f"kv-{n}:1" for n in "abc"}
        async with KvClient(
            addresses, "client-1", transport=network.transport("cli:1"), timeout_s=20
        ) as client:
            assert (await client.put("k", b"1")).ok
            assert await client.get("k") == b"1"
            assert await client.get("missing") is None
            cas = await client.cas("k", b"1", b"2")
            assert cas.ok
            failed = await client.cas("k", b"1", b"3")
            assert not failed.ok and failed.value == b"2"
            assert (await client.delete("k")).ok
            assert await client.get("k") is None
            leader = next(n for n, s in servers.items() if s.service.is_leader)
            status = await client.status(leader)
            assert status is not None and status.leader_id == leader
        nursery.cancel_scope.cancel()


async def test_garbage_request_drops_the_connection_and_is_counted(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    network = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        server = await start_node(nursery, network, tmp_path, "a")
        stream = await network.transport("evil:1").connect("kv-a:1")
        await stream.send_all(encode_frame(b"\x93\x01\x02"))  # msgpack, but no such request
        reader = FrameReader(stream, 1 << 20)
        with trio.fail_after(5):
            assert await reader.receive() is None  # the server hung up
        assert server.bad_requests == 1
        # A well-formed status request on a fresh connection still works.
        stream = await network.transport("ok:1").connect("kv-a:1")
        await stream.send_all(encode_frame(codec.encode(KvStatusRequest(7))))
        with trio.fail_after(5):
            payload = await FrameReader(stream, 1 << 20).receive()
        assert payload is not None
        response: KvResponse = codec.decode(payload, KvResponse)
        assert response.req_id == 7 and response.status is not None
        nursery.cancel_scope.cancel()
